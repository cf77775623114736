"""The pipeline class of this folder, for diffusers' generic loader:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="refine_by_align_pipeline",
                                      trust_remote_code=True)

The refine-by-align repository must be importable.
"""

from models.pipeline import RefineByAlignPipeline  # noqa: F401
