# L-BFGS (the full-batch solver of fine-tuning): known minima, the stop
# callback, NaN regions.
run optim.lbfgs 120 "$TBIN/test_optim"
