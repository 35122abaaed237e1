"""groundset.stages.filter"""
