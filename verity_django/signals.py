from __future__ import annotations

from django.dispatch import Signal

# Sent once per delivered batch, after commit, with ``batch``: the
# deduplicated directives a request, block or transaction produced.
directives_committed = Signal()

# Sent after each envelope is stored and handed to the transports, with
# ``audience``, ``seq`` and ``envelope`` (the JSON text).
envelope_published = Signal()
