"""Owner markers of real RSA keys for record tests: ``marker(name)`` is the subkey a peer called ``name`` signs
its entries under, ``peer(name)`` the peer id a reader derives from it."""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from swarmd.daemon.identity import peer_id_from_public_key


@functools.cache
def _key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024 if name.startswith("fast") else 2048)


def marker(name: str) -> bytes:
    public = _key(name).public_key()
    return b"[owner:" + public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"]"


def peer(name: str) -> str:
    public = _key(name).public_key()
    return peer_id_from_public_key(public.public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))


def private_key(name: str) -> rsa.RSAPrivateKey:
    return _key(name)
