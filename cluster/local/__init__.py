"""A multi-node Ray cluster on one machine: its bookkeeping and the node provider behind `ray up
deploy/clusters/local.yaml`."""
