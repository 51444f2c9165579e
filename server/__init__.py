"""ragzip.server"""
