"""``python -m dorafactors``: the doctor report (``dorafactors/doctor/``)."""

from .doctor import main

raise SystemExit(main())
