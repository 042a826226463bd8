"""Settings for the test suite: the demo project's, plus the suite's own app.

The demo stays installed because the transaction tests
(``tests/test_transactions.py``) use its models; every other unit test uses
``tests.testapp``, whose URLs are the root ones here. Servers started by the
live tests keep the demo's own settings (``liveservers/processes.py`` sets
them).
"""

from __future__ import annotations

from testproject.settings import *  # noqa: F403
from testproject.settings import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp.apps.TestAppConfig"]
ROOT_URLCONF = "tests.testapp.urls"

# The suite creates users in most tests' fixtures, and the default PBKDF2 hash
# takes most of a second each; what the tests prove never depends on how a
# password is hashed. Servers the live tests start keep the demo's hashers.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
