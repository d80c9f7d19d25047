"""moemesh.kernels: tensor math and the model. No Ray, no gRPC, no HTTP."""
