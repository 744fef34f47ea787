"""The device key (``<state_dir>/device-key.pem``): checked cheaply at start, loaded when first used.

The key signs the audit log's checkpoints (security/audit.py) and its public half goes into
the MQTT birth message. Loading it means importing cryptography (its Rust extension and
libcrypto: about 10 MiB resident), which an agent with no MQTT has no use for until its
first checkpoint. So `DeviceKey.precheck` reads the file the way a person would check it —
there, a regular file, readable, one unencrypted PKCS#8 PEM block naming Ed25519 — without
cryptography, so a bad key is reported at start; `DeviceKey.get` parses it (or makes it,
0600, when there is none) the first time a signature is needed. A key that passes the
precheck and still fails to load is reported by whoever signs (the audit log counts the
checkpoint as lost and says why).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.files import write_file_atomic

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

KEY_NAME = "device-key.pem"
#: A PKCS#8 Ed25519 key is one short PEM block; anything past this is not one.
MAX_KEY_BYTES = 16 * 1024
#: The DER of the Ed25519 algorithm identifier's OID (1.3.101.112, RFC 8410), inside the block.
_ED25519_OID = bytes.fromhex("06032b6570")
_PEM = re.compile(rb"-----BEGIN PRIVATE KEY-----\s+([A-Za-z0-9+/=\s]+?)-----END PRIVATE KEY-----")


def load_or_create_device_key(state_dir: Path) -> Ed25519PrivateKey:
    """``<state_dir>/device-key.pem``, made (0600) at first use. Raises ValueError naming the
    file when it exists but is not an Ed25519 private key, OSError when it cannot be made."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = state_dir / KEY_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        state_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, pem, mode=0o600)
        log.info("audit: made the device key %s", path)
        return key
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return loaded


def precheck_device_key(path: Path) -> tuple[str | None, str | None]:
    """(problem, warning) about the key file at `path`, read without cryptography: a problem
    means it cannot sign (not a file, unreadable, not an unencrypted PKCS#8 Ed25519 PEM); a
    warning that it can but should not be as it is (readable by others). A missing file is
    neither: it is made when first needed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return f"{path}: cannot stat it ({exc.strerror})", None
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file", None
    if st.st_size > MAX_KEY_BYTES:
        return f"{path}: {st.st_size} bytes, too big for an Ed25519 key", None
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror})", None
    block = _PEM.search(data)
    if block is None:
        return f"{path}: not an unencrypted PEM private key (no 'BEGIN PRIVATE KEY' block)", None
    try:
        der = base64.b64decode(b"".join(block.group(1).split()), validate=True)
    except binascii.Error:
        return f"{path}: the PEM block is not base64", None
    if _ED25519_OID not in der:
        return f"{path}: not an Ed25519 key", None
    mode = stat.S_IMODE(st.st_mode)
    warning = f"{path}: readable by others (mode {mode:o})" if mode & 0o077 else None
    return None, warning


class DeviceKey:
    """The device key of one state dir, loaded (or made) by the first `get`; thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / KEY_NAME
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> Ed25519PrivateKey | None:
        """The key once a `get` has loaded it, else None (never loads)."""
        return self._key

    def precheck(self) -> str | None:
        """What is wrong with the key file, seen without loading it (None: nothing seen);
        a key readable by others is logged as a warning."""
        problem, warning = precheck_device_key(self.path)
        if warning:
            log.warning("audit: %s; chmod 600 it", warning)
        return problem

    def get(self) -> Ed25519PrivateKey:
        """The key, loaded or made now if it was not; raises ValueError (a bad file) or OSError
        (it cannot be read or made). A failure is not kept: the next call tries again."""
        with self._lock:
            if self._key is None:
                self._key = load_or_create_device_key(self.state_dir)
            return self._key
