"""``python -m s3ssefs`` is the ``s3ssefs`` command."""

from s3ssefs.cli import main

raise SystemExit(main())
