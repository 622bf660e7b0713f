"""The paper's benchmarks: VIST contextual retrieval (Table 1), VisDial (Table 2), CLIP rows."""
