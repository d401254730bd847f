"""Dashboard pages (run through ``app.py``); ``common`` holds their shared logic."""
