"""Image-caption data: WebDataset shards streamed as batches, and images opened by source."""
