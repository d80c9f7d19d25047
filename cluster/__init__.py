"""moemesh.cluster"""
