"""Distillation methods of the generative (diffusion) domain: each module is one method, faithful to its paper
and official code, on the adapter of `bench.diffusion` (DESIGN.md "the other domains")."""
