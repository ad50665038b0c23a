"""Pure domain rules shared by connectors and services: volumes, prices, comments, money, calendars.

Nothing here does I/O; everything here imports only ``schemas`` and the standard library.
"""
