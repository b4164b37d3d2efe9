"""maskmint: segmentation datasets (image, mask, background) minted by text-to-image diffusion models.

`from maskmint import segmentation_dataset` is the reader training code uses; the CLI is
the `maskmint` command (`maskmint.launch`).
"""

__version__ = "0.1.0"
__all__ = ["segmentation_dataset"]


def __getattr__(name: str):
    # Lazy: `import maskmint` stays light (no torch, no webdataset) until the reader is used.
    if name == "segmentation_dataset":
        from maskmint.pipeline.dataset import segmentation_dataset

        return segmentation_dataset
    raise AttributeError(f"module 'maskmint' has no attribute {name!r}")
