"""Backend legalization: rewrite what an exporter cannot translate; adapter tensors as inputs."""
