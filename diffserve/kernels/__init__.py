"""Attention kernels and fused ops. Knows nothing of platforms: each backend says whether it can run here
(and why not); choosing among them is the platforms package's job."""
