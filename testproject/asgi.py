import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
# The demo runs under uvicorn alone, with no web server in front for /static/.
application = ASGIStaticFilesHandler(get_asgi_application())
