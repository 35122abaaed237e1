"""groundset.tools"""
