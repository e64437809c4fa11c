# Common modules: config, RNG, util.
run common.unit 120 "$TBIN/test_common"
