from django.apps import AppConfig


class TodosConfig(AppConfig):
    name = "testproject.todos"
    label = "todos"
    default_auto_field = "django.db.models.BigAutoField"
