"""Images in, uint8 batches out: sources (image folders, tfds), transforms, the loader."""
