"""magcache"""
