"""Data: webdataset shards (`shards`), streaming, transforms and the data module (`stream`)."""
