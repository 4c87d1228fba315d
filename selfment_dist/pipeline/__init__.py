"""Ray pipelines: compose the algorithm modules (which know nothing of Ray) with Ray Data and Ray Train."""
