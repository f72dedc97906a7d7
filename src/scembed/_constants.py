"""The AnnData keys that scembed reads and writes, in one place."""

from __future__ import annotations

REP_PCA = "X_pca"
AFFINITY = "affinity"
EE = "ee"
NEURALEE = "neuralee"
SCDEEPCLUSTER = "scdeepcluster"
IMAP = "imap"
