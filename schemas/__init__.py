"""Validated configuration and the records maskmint writes."""
