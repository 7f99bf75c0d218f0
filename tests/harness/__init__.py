"""Helpers that run real servers, real clients, ftpfix itself and the NAT lab."""
