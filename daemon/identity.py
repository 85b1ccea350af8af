"""A node's identity is its libp2p key (the file p2pd reads). swarmd signs with the same key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
IDENTITY_FILE = "identity.key"


def peer_id_from_public_key(public_der: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in DER SubjectPublicKeyInfo form."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def verify_signature(public_der: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the private half of ``public_der``."""
    try:
        key = serialization.load_der_public_key(public_der)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, data, _PSS, hashes.SHA256())
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


@dataclass(frozen=True)
class NodeIdentity:
    """The node's libp2p RSA key: its path (handed to p2pd), its peer id, and a signer."""

    path: Path
    private_key: rsa.RSAPrivateKey

    @classmethod
    def load_or_create(cls, node_dir: Path) -> NodeIdentity:
        """Read ``node_dir/identity.key``, creating a fresh key there on first use."""
        node_dir.mkdir(parents=True, exist_ok=True)
        path = node_dir / IDENTITY_FILE
        if not path.exists():
            P2P.generate_identity(str(path))
        key_data = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        private_key = serialization.load_der_private_key(key_data, password=None)
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA key")
        return cls(path, private_key)

    @property
    def public_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_der)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, _PSS, hashes.SHA256())
