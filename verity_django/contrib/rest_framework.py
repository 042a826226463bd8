"""Django REST framework integration.

With ``DirectiveMiddleware`` installed, every DRF response already gains
``"directives"`` when the client asks for them. Set
``VERITY["INJECT_DRF_RESPONSES"] = False`` to limit that to the views that
use :class:`DirectivesMixin`.
"""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response


class DirectivesMixin:
    """Opt a DRF view into directive injection."""

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        response.verity_inject = True  # type: ignore[attr-defined]
        return response
