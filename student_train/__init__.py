"""student_train"""
