"""Billing: plans, the four fee modules, the platform fee, invoices and charges, Stripe Connect."""
