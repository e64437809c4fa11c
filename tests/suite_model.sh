# The Performer encoder: layers against finite differences in double, the
# float kernels against the double ones, and whole-model properties.
run model.layers_fd 300 "$TBIN/test_layers"
run model.encoder 300 "$TBIN/test_model"
run model.vs_pytorch 300 bash tests/model_reference.sh
