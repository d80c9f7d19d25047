"""moemesh.actors"""
