"""Attention capture: the recipes that turn a denoiser's attention into per-concept heat maps.

A recipe is a store (`store.CaptureStore`): generate begins it per batch, diffusers' step
callback advances it, and it returns the maps. Which recipes a model offers, and the
processors or hooks that feed them, are its family's to say (`stages/families`).
"""
