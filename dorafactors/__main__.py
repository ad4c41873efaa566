"""``python -m dorafactors``: the doctor report (``dorafactors/doctor.py``)."""

from .doctor import main

raise SystemExit(main())
