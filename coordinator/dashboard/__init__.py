"""The web dashboard (server-rendered): `/admin` for admins, `/dashboard` for customers and providers."""
