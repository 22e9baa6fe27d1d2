"""Downstream tasks of a pre-trained encoder (beyond ``volvlp_ray.eval``'s retrieval and classification):
``segmentation`` (organ segmentation heads on the ViT3D, ``jobs/segmentation.py``) and ``reports`` (report
generation, ``jobs/report_generation.py``); ``cli`` is the command line both jobs share."""
