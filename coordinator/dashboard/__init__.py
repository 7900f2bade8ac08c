"""The web dashboard (server-rendered with Jinja2; htmx refreshes the fleet table in place): `/admin` for admins
(`admin.py`), `/dashboard` for customers and providers (`own.py`), login (`auth.py`); `pages.py` renders and
guards them all. Every page's database work is one thread hop, like the API's."""
