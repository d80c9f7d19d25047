"""moemesh.proto"""
