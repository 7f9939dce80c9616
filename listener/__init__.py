"""merkle-listener: tamper-evident PostgreSQL tables.

Every committed change to a registered source table becomes a leaf of an RFC 9162 Merkle
tree kept in PostgreSQL; anyone can check inclusion and consistency proofs against it.
"""

__version__ = "0.1.0"
