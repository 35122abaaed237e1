"""groundset.exports"""
