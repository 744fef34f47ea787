"""Who runs next: the per-model job queues, continuous batching's admission, and the
budgets (latency, working memory) the schedulers decide by."""
