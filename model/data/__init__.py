"""lamflow.model.data: systems on disk (deepmd/npy, any dpdata format) as memory-mapped frames,
neighbour lists, batches and the streaming loader."""
