"""groundset.core"""
