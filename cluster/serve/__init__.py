"""Builders: a DeploymentConfig -> a Ray Serve application, one module per role; the Ray-side hosts of the plain
classes; how `moemesh serve` deploys and stops."""
