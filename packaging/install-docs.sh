#!/bin/sh
# Install every page of docs/ into a package root, as /usr/share/doc/edgefleet/<page>.md,
# with the images they show (img/*.png). All of them, so the pages' links to each other
# (mqtt.md, telemetry.md#…, img/fleet-view.png) resolve on the device. build-deb.sh runs it; tests/test_docs_blocks.py runs it and follows every link.
#   usage: install-docs.sh SOURCE_TREE PACKAGE_ROOT
set -eu
src=$1
root=$2
for doc in "$src"/docs/*.md; do
  install -D -m 0644 "$doc" "$root/usr/share/doc/edgefleet/$(basename "$doc")"
done
for image in "$src"/docs/img/*.png; do
  [ -e "$image" ] || continue
  install -D -m 0644 "$image" "$root/usr/share/doc/edgefleet/img/$(basename "$image")"
done
