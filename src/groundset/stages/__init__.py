"""groundset.stages"""
