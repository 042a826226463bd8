from __future__ import annotations

from django.apps import AppConfig


class VerityDjangoConfig(AppConfig):
    name = "verity_django"
    verbose_name = "Verity directives"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from verity_django import checks, registry, revocation, storage

        checks.register_checks()
        registry.load_meta_rules()
        revocation.connect_signals()
        connection_created.connect(
            storage.bound_reader_session, dispatch_uid="verity_django.bound_reader_session"
        )
