#!/usr/bin/env python3
"""Write a small random count matrix as .h5ad (40 genes), for stream layouts.

    /usr/bin/python3 tests/py/stream_tiny_h5ad.py OUT.h5ad N_CELLS SEED
"""
import sys

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def main():
    out, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    x = sp.random(n, 40, density=0.3, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    obs = pd.DataFrame(index=[f"s{seed}-c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(40)])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(out)


if __name__ == "__main__":
    main()
