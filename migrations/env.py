"""Alembic environment for sessionstore.

The work is done by :func:`sessionstore.migrate.run_env`, so that ``alembic upgrade
head`` from a checkout and the in-process upgrade a SessionManager runs on start share
one code path (the same engine set-up, write lock and refusal of foreign databases).
"""

from alembic import context

from sessionstore.migrate import run_env

run_env(context)
