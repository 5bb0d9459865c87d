"""s3ssefs: a FUSE filesystem for S3 buckets encrypted with customer-provided keys (SSE-C)."""

__version__ = "0.1.0"
